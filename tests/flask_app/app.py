"""A minimal Flask shop that queues its mail with mailqueue (used by tests/test_flask.py).

Written the way a Flask-Mail user would write it; the only mailqueue-specific
lines are the imports, ``mail.init_app(app, db=db)`` and
``db.session.commit()`` deciding whether the mail exists.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mailqueue.contrib.flask import MailQueue, Message


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
mail = MailQueue()


class Order(db.Model):  # type: ignore[name-defined]
    __tablename__ = "flask_order"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


def create_app(config: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    db.init_app(app)
    mail.init_app(app, db=db)
    with app.app_context():
        db.create_all()

    @app.post("/orders")
    def place_order():
        order = Order(email=request.form["email"])
        db.session.add(order)
        db.session.flush()
        msg = Message(
            f"Order {order.id}",
            recipients=[order.email],
            cc=["sales@example.com"],
            bcc=["audit@example.com"],
            reply_to="help@example.com",
            body=f"Thanks for order {order.id}.",
            html=f"<p>Thanks for order <b>{order.id}</b>.</p>",
            extra_headers={"X-Shop-Order": str(order.id)},
            idempotency_key=f"flask-order-{order.id}",
            metadata={"order": str(order.id)},
        )
        msg.attach("receipt.csv", "text/csv", f"order,total\n{order.id},42.00\n".encode())
        mid = mail.send(msg)  # in db.session's transaction
        if request.form.get("card") == "declined":
            db.session.rollback()
            return jsonify(error="payment declined"), 402
        db.session.commit()
        return jsonify(order=order.id, mailqueue_id=mid)

    @app.post("/contact")
    def contact():
        # Outside any transaction of ours: queued (and committed) at once.
        mid = mail.send(
            Message("Contact form", recipients=["team@example.com"], body=request.form["text"]),
            session=False,
        )
        return jsonify(mailqueue_id=mid)

    return app
