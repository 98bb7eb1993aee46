"""Composes the deskgen application: four model stages and the experiment recorder behind one HTTP ingress.

``serve_config.yaml`` points at ``graph:app``. ``app`` is a typed builder, so the config's ``args``
(model locations — the only change needed for real weights) arrive validated as :class:`DeskgenArgs`.
Resources, autoscaling and ``user_config`` come from the config's ``deployments`` section.
"""

# No `from __future__ import annotations` here: Serve reads the builder's annotation at runtime to
# validate `args` into DeskgenArgs, and a string annotation would skip that.

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.captioner import Captioner
from deployments.classifier import Classifier
from deployments.consumer import job_consumer
from deployments.generator import Generator, MixCache
from deployments.ingress import Ingress
from deployments.locator import Locator
from deployments.recorder import Recorder
from deskgen.generator.settings import settings_from_options
from deskgen.imagestore import ImageStoreSettings
from deskgen.jobs.settings import JobsSettings


class DeskgenArgs(BaseModel):
    """Where the models are. Relative paths resolve against the project root; a hub id
    (``owner/name``) loads from the Hugging Face cache."""

    model_config = ConfigDict(extra="forbid")

    classifier_model: str = Field("models/tiny/classifier/desk_gate.keras", description="a Keras .keras file")
    captioner_model: str = Field("models/tiny/blip", description="BLIP folder or hub id")
    generator_model: str = Field("models/tiny/sdxl", description="SDXL folder or hub id")
    lora_dir: str = Field("models/tiny/loras", description="folder of <adapter>.safetensors files")
    locator_model: str = Field("models/tiny/owlv2", description="OWLv2 folder or hub id (product location)")
    experiments_db: str = Field(
        "sqlite:///build/experiments.db",
        description="SQLAlchemy URL of the A/B experiment store: SQLite (a relative path is under the project "
        "root; one Recorder replica) or postgresql+psycopg://user:password@host/db (Recorder may scale out)",
    )
    image_store: ImageStoreSettings = Field(
        default_factory=ImageStoreSettings,
        description="where delivered images are kept, bounded in size and time (deskgen.imagestore): what "
        "LoRA training on liked images reads",
    )
    jobs: JobsSettings | None = Field(
        default_factory=JobsSettings,
        description="asynchronous jobs and idempotency keys (deskgen.jobs.settings): Redis URL, queue bound, "
        "retention, retries; null = no jobs (the app then has no JobConsumer deployment)",
    )
    device: str | None = Field(None, description="force a torch device (default: cuda if available, else cpu)")
    dtype: str | None = Field(None, description="force a torch dtype (default: fp16/bf16 on cuda, fp32 on cpu)")
    tf_threads: int | None = Field(None, ge=1, description="TensorFlow threads per classifier replica")
    generator_options: dict[str, object] = Field(
        default_factory=dict,
        description="deskgen.generator.GeneratorSettings fields (speed flags) and `speed_profile`; checked at build",
    )
    generator_cache: MixCache = Field(
        default_factory=MixCache,
        description="mixes cached and adapters kept loaded per Generator replica (deployments.generator.MixCache)",
    )


def build_app(args: DeskgenArgs) -> Application:
    # Typed here, at `serve run` / `serve deploy` time: a misspelt generator option fails the deploy with
    # a message naming it, not the GPU replica minutes later. No model library is imported for this.
    settings = settings_from_options(
        {"model_id": args.generator_model, "lora_dir": args.lora_dir, "device": args.device, "dtype": args.dtype,
         **args.generator_options}
    )  # fmt: skip
    # Serve's decorators return Deployment objects that mypy sees as the plain classes.
    if args.jobs is not None and args.image_store.dir is None:
        raise ValueError("args.jobs: jobs keep their images in the image store; set args.image_store.dir (or jobs: null)")
    jobs = {} if args.jobs is None else {
        "jobs": args.jobs.model_dump(),
        "consumer": job_consumer(args.jobs).bind(args.jobs.model_dump(), args.image_store.model_dump()),
    }  # fmt: skip
    return Ingress.bind(  # type: ignore[attr-defined, no-any-return]
        classifier=Classifier.bind(args.classifier_model, tf_threads=args.tf_threads),  # type: ignore[attr-defined]
        captioner=Captioner.bind(args.captioner_model, device=args.device, dtype=args.dtype),  # type: ignore[attr-defined]
        generator=Generator.bind(settings, cache=args.generator_cache),  # type: ignore[attr-defined]
        recorder=Recorder.bind(args.experiments_db),  # type: ignore[attr-defined]
        lora_dir=args.lora_dir,
        image_store=args.image_store.model_dump(),
        locator=Locator.bind(args.locator_model, device=args.device, dtype=args.dtype),  # type: ignore[attr-defined]
        **jobs,
    )


#: The import path of serve_config.yaml. A builder function: `serve run graph:app` calls it with no args.
app = build_app
