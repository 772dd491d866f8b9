"""Django settings: everything mailqueue needs is at the bottom."""

import os
from pathlib import Path

import django

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only"
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
ROOT_URLCONF = "exampleshop.urls"
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes"]
MIDDLEWARE = []
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Example Shop <shop@example.com>"
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "example.db"},
}

# --- mailqueue -------------------------------------------------------------
# Django and mailqueue share example.db: the mail rows are written in the
# view's transaction (same_database) and commit or roll back with the user.
# The worker must see the same MAILQUEUE_* values: put them in its
# environment (see README.md) — they are read from the environment here too.
MAILQUEUE_DATABASE_URL = os.environ.get(
    "MAILQUEUE_DATABASE_URL", f"sqlite:///{BASE_DIR / 'example.db'}"
)
MAILQUEUE_BROKER_URL = os.environ.get(
    "MAILQUEUE_BROKER_URL", f"sqla+sqlite:///{BASE_DIR / 'broker.db'}"
)
MAILQUEUE_RELAY_URL = os.environ.get("MAILQUEUE_RELAY_URL", "smtp://127.0.0.1:1025")

if django.VERSION >= (6, 1):
    MAILERS = {
        "default": {
            "BACKEND": "mailqueue.contrib.django.EmailBackend",
            "OPTIONS": {"same_database": True},
        },
    }
else:
    EMAIL_BACKEND = "mailqueue.contrib.django.EmailBackend"
    MAILQUEUE_DJANGO_SAME_DATABASE = True
