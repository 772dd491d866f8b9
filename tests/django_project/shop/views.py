"""Views that send mail the way any Django app does; mailqueue is only the EMAIL backend."""

import json

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, send_mail, send_mass_mail
from django.db import transaction
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Order


class PaymentDeclined(Exception):
    pass


@csrf_exempt
def place_order(request):
    """Create an order and its receipt mail in one transaction; a declined card undoes both."""
    db = settings.SHOP_DATABASE
    email = request.POST["email"]
    try:
        with transaction.atomic(using=db):
            order = Order.objects.using(db).create(email=email, total_cents=4200)
            receipt = EmailMultiAlternatives(
                subject=f"Order {order.pk} confirmed",
                body=f"Thanks for order {order.pk}.",
                to=[email],
                cc=["sales@example.com"],
                bcc=["audit@example.com"],
                reply_to=["help@example.com"],
                headers={
                    "X-Mailqueue-Idempotency-Key": f"order-{db}-{order.pk}",
                    "X-Mailqueue-Metadata": json.dumps({"order": str(order.pk)}),
                    "X-Mailqueue-Tags": "receipt, shop",
                    "X-Shop-Order": str(order.pk),
                },
            )
            receipt.attach_alternative(f"<p>Thanks for order <b>{order.pk}</b>.</p>", "text/html")
            receipt.attach("receipt.txt", f"order {order.pk}: 42.00 EUR\n", "text/plain")
            receipt.send()
            if request.POST.get("card") == "declined":
                raise PaymentDeclined
    except PaymentDeclined:
        return HttpResponse("payment declined", status=402)
    return JsonResponse({"order": order.pk, "mailqueue_id": receipt.mailqueue_id})


@csrf_exempt
def welcome(request):
    sent = send_mail(
        "Welcome",
        "Hello and welcome.",
        None,
        [request.POST["email"]],
        html_message="<h1>Welcome</h1>",
    )
    return JsonResponse({"sent": sent})


@csrf_exempt
def newsletter(request):
    addresses = request.POST.getlist("email")
    sent = send_mass_mail([(f"News for {a}", "This month: queues.", None, [a]) for a in addresses])
    return JsonResponse({"sent": sent})
