import os
import sys

from django.conf import settings
from django.http import JsonResponse
from django.urls import path, re_path
from django.views.static import serve


def index(request):
    return JsonResponse({
        "dyno": os.environ.get("DYNO"),
        "profile_greeting": os.environ.get("PROFILE_GREETING"),
        "request_id": request.headers.get("X-Request-Id"),
        "forwarded_for": request.headers.get("X-Forwarded-For"),
        "python": sys.executable,
    })


urlpatterns = [
    path("", index),
    # The files collectstatic gathered at build time (Heroku apps use WhiteNoise for this).
    re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATIC_ROOT}),
]
