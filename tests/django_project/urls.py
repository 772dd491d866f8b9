from django.contrib import admin
from django.urls import path

from . import errors
from .shop import views

urlpatterns = [
    path("order/", views.place_order),
    path("welcome/", views.welcome),
    path("newsletter/", views.newsletter),
    path("broken/", errors.broken),
    path("admin/", admin.site.urls),
]
