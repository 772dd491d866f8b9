"""A minimal Django project that queues its mail with mailqueue (used by tests/test_django.py).

The databases come from the environment the test session sets up:
``MQ_DJANGO_SQLITE`` (the ``default`` database, a SQLite file that also holds
mailqueue's tables) and, when PostgreSQL is reachable, ``MQ_DJANGO_PG_*``
(the ``pg`` database, likewise).
"""

import os

import django

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
ROOT_URLCONF = "tests.django_project.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "tests.django_project.shop"]
MIDDLEWARE = []

# The mailqueue admin (tests/test_django_admin*.py): Django's admin and what it needs.
INSTALLED_APPS += [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "mailqueue.contrib.django_admin",
]
MIDDLEWARE += [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["MQ_DJANGO_SQLITE"]},
}
if os.environ.get("MQ_DJANGO_PG_NAME"):
    DATABASES["pg"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["MQ_DJANGO_PG_NAME"],
        "USER": os.environ["MQ_DJANGO_PG_USER"],
        "PASSWORD": os.environ.get("MQ_DJANGO_PG_PASSWORD", ""),
        "HOST": os.environ["MQ_DJANGO_PG_HOST"],
        "PORT": os.environ["MQ_DJANGO_PG_PORT"],
    }

# Which database the shop's views write orders to (tests switch it).
SHOP_DATABASE = "default"

# mailqueue: the same backend through either of Django's two mechanisms.
if django.VERSION >= (6, 1):
    MAILERS = {
        "default": {"BACKEND": "mailqueue.contrib.django.EmailBackend"},
        "bulk": {
            "BACKEND": "mailqueue.contrib.django.EmailBackend",
            "OPTIONS": {"relay": "bulk"},
        },
    }
else:
    EMAIL_BACKEND = "mailqueue.contrib.django.EmailBackend"
