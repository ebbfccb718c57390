"""``doctor``: checks a deployment's settings against the real PBX, broker, Redis, HAProxy, TLS
certificate and Creatio site, and prints a checklist with the fix for every failure."""
