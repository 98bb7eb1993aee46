"""The HTTP ingress: the app of deployments/app.py on ``@serve.ingress``, its routes composed from
deployments/routes/ (one module per resource, each route a few lines), holding handles to the model stages.
Generation is deployments/pipeline.py; answers are rendered by deployments/render.py. It never imports
TensorFlow or torch.
"""

# No `from __future__ import annotations`: Serve pickles this class by value, and FastAPI must
# resolve the route annotations (Request) in the replica, where string annotations cannot be.

from ray import serve

from deployments.app import api
from deployments.routes.analysis import AnalysisRoutes
from deployments.routes.catalogue import CatalogueRoutes
from deployments.routes.experiments import ExperimentRoutes
from deployments.routes.generation import GenerationRoutes
from deployments.routes.jobs import JobRoutes
from deployments.routes.ops import OpsRoutes


class IngressRoutes(OpsRoutes, CatalogueRoutes, AnalysisRoutes, GenerationRoutes, JobRoutes, ExperimentRoutes):
    """Every route of the ingress (the mixins of deployments/routes/) over their shared state (RoutesBase).

    A plain class, wrapped into the ``Ingress`` deployment at the end of the module: Serve then
    pickles it by reference, so the replica imports this module whole (a class decorated in place
    is pickled by value at decoration time and misses everything defined after it)."""


Ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)(
    serve.ingress(api)(IngressRoutes)
)
