from django.contrib import admin
from django.urls import path

from .shop import views

urlpatterns = [
    path("order/", views.place_order),
    path("welcome/", views.welcome),
    path("newsletter/", views.newsletter),
    path("admin/", admin.site.urls),
]
