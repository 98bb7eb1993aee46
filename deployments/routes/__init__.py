"""The ingress's routes, one module per resource (ops, catalogue, analysis, generation, experiments), each a
mixin of :class:`deployments.routes.base.RoutesBase` whose methods are declared on the app of
deployments/app.py; deployments/ingress.py composes them into the Ingress deployment."""
