"""The HTTP door of the ingress, with the serving layer (the Ray-free model layer deskgen/ knows nothing of
it): API keys (apikeys.py, with the minting CLI), per-key rate and concurrency limits (ratelimit.py),
admission control with Retry-After as a place in a virtual queue (admission.py) and the errors the door
answers with (errors.py). deployments/access.py is the middleware that applies them."""
