"""Flask example: Flask-SQLAlchemy + mailqueue, the mail commits with the user row."""

import os

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from mailqueue.contrib.flask import MailQueue, Message
from mailqueue.contrib.status import anymail_statuses

HERE = os.path.dirname(os.path.abspath(__file__))

app = Flask(__name__)
app.config.update(
    SQLALCHEMY_DATABASE_URI=os.environ.get(
        "MAILQUEUE_DATABASE_URL", f"sqlite:///{HERE}/example.db"
    ),
    # Any MAILQUEUE_* name of mailqueue's configuration table works here.
    MAILQUEUE_BROKER_URL=os.environ.get("MAILQUEUE_BROKER_URL", f"sqla+sqlite:///{HERE}/broker.db"),
    MAILQUEUE_RELAY_URL=os.environ.get("MAILQUEUE_RELAY_URL", "smtp://127.0.0.1:1025"),
    MAILQUEUE_DEFAULT_SENDER=("Example Shop", "shop@example.com"),
)
db = SQLAlchemy(app)
mail = MailQueue(app, db=db)  # sends go into db.session; MAILQUEUE_DATABASE_URL = the app's DB


class User(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


with app.app_context():
    db.create_all()


@app.post("/signup")
def signup():
    user = User(email=request.form["email"])
    db.session.add(user)
    db.session.flush()
    msg = Message(
        "Welcome!",
        recipients=[user.email],
        body="Hello.",
        html="<h1>Hello</h1>",
        idempotency_key=f"welcome-{user.id}",
    )
    msg.attach("terms.txt", "text/plain", b"Be nice.\n")
    mid = mail.send(msg)
    if request.args.get("fail"):
        db.session.rollback()  # no user, no mail
        return jsonify(error="rolled back"), 500
    db.session.commit()  # the user and the mail, together
    return jsonify(user=user.id, mailqueue_id=mid)


@app.get("/status/<int:user_id>")
def status(user_id):
    info = mail.get_status_by_key(f"welcome-{user_id}")
    return jsonify(status=info.status, anymail=sorted(anymail_statuses(info)))
