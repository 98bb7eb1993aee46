"""``deskgen``: the command line for the deskgen API, on :class:`deskgen_client.Deskgen`.

    deskgen generate desk.jpg --mix ott_3d --seed 42 -o out.png
    deskgen text2img "a minimalist desk setup, warm light" --steps 20 -o desk.png
    deskgen generate desk.jpg --products monitor,keyboard --annotate boxes.png
    deskgen locate photo.jpg --products monitor,keyboard --annotate boxes.png
    deskgen mixes
    deskgen feedback IMAGE_ID like
    deskgen jobs submit "a desk at dawn" --seeds 1 2 3 --watch      # a batch job, followed to its end
    deskgen jobs submit --photo desk.jpg --webhook https://backend.example.com/hooks
    deskgen jobs watch JOB_ID ; deskgen jobs get JOB_ID ; deskgen jobs cancel JOB_ID

The server is ``--url``, else ``$DESKGEN_URL``, else http://127.0.0.1:8000; the API key ``--api-key``, else
``$DESKGEN_API_KEY``. Generations stream their progress (a bar driven by the step events, on stderr) and
print the image id, mix, seed, prompt, timings and the products found with their boxes (stdout); ``--json``
prints the JSON answer instead.
Exit status: 0 done, 1 the server answered an error (its message on stderr), 2 a usage error, 3 no
answer (connection refused, timed out, cut short), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, cast

from pydantic import BaseModel

from deskgen_client import (
    DEFAULT_URL,
    Captioned,
    Classified,
    Deskgen,
    DeskgenConnectionError,
    DeskgenError,
    GenerateKwargs,
    GenerationKwargs,
    GenerationResult,
    Located,
    ProductLocation,
    ProgressEvent,
    Started,
    Step,
    Unauthorized,
)
from deskgen_client.jobs import JobEvent
from deskgen_client.protocol import JobAnswer
from deskgen_client.rules import FEEDBACK_EVENTS

EXIT_OK, EXIT_API_ERROR, EXIT_USAGE, EXIT_NO_ANSWER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class ProgressBar:
    """The generation's progress on stderr: one line per stage event and a bar the step events fill.
    On a terminal the bar redraws in place; elsewhere (a log, a pipe) each step is its own line."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._open_line = False

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, Step):
            self.step(event.step, event.total)
        elif isinstance(event, Classified):
            self.line(f"desk score {event.score:.3f} (threshold {event.threshold:g})")
        elif isinstance(event, Captioned):
            self.line(f"prompt: {event.prompt}")
        elif isinstance(event, Started):
            self.line(f"generating with {event.mix_id} on {event.replica} (queued {event.queued_s:.2f} s)")
        elif isinstance(event, Located):
            self.line(f"products: {products_headline(event.products)}")

    def step(self, step: int, total: int) -> None:
        filled = self.width * step // max(total, 1)
        bar = f"steps [{'#' * filled}{'-' * (self.width - filled)}] {step}/{total} {100 * step // max(total, 1):3d}%"
        if self.tty:
            self.stream.write(f"\r{bar}")
            self._open_line = step < total
            if not self._open_line:
                self.stream.write("\n")
        else:
            self.stream.write(f"{bar}\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(f"{text}\n")
        self.stream.flush()


# -- the commands -------------------------------------------------------------------------------------


def cmd_generate(client: Deskgen, args: argparse.Namespace) -> int:
    output = output_path(args.output)
    annotated = annotate_path(args)
    options = GenerateKwargs(**generation_options(args))
    if args.style is not None:
        options["style"] = args.style
    progress = None if args.no_progress else ProgressBar(sys.stderr)
    result = client.generate(args.photo, on_event=progress, request_id=args.request_id, **options)
    return show_result(result, output, annotated, args.json)


def cmd_text2img(client: Deskgen, args: argparse.Namespace) -> int:
    output = output_path(args.output)
    annotated = annotate_path(args)
    progress = None if args.no_progress else ProgressBar(sys.stderr)
    result = client.text2img(args.prompt, on_event=progress, request_id=args.request_id, **generation_options(args))
    return show_result(result, output, annotated, args.json)


def cmd_locate(client: Deskgen, args: argparse.Namespace) -> int:
    annotated = output_path(args.annotate, option="--annotate")
    result = client.locate(args.image, args.products, annotate=annotated is not None)
    if annotated is not None:
        result.save_annotated(annotated)
    if args.json:
        return print_json({**result.model_dump(mode="json", exclude={"image_b64", "annotated_b64"}), **({"annotated": str(annotated)} if annotated else {})})
    show_products(result.products, sys.stdout)
    if annotated is not None:
        print(f"annotated    {annotated}", file=sys.stdout)
    return EXIT_OK


def cmd_concepts(client: Deskgen, args: argparse.Namespace) -> int:
    concepts = client.concepts()
    if args.json:
        return print_json(concepts)
    out = sys.stdout
    print(f"today        {concepts.today or '(none scheduled)'} ({concepts.weekday}, {concepts.timezone}): concept=auto", file=out)
    schedule = " · ".join(f"{day} {name}" for day, name in concepts.schedule.items()) or "(empty)"
    print(f"schedule     {schedule}", file=out)
    print("concepts", file=out)
    width = max((len(n) for n in concepts.concepts), default=0)
    for name, preset in concepts.concepts.items():
        print(f"  {name:<{width}}  {preset.get('prompt', '')}{concept_defaults(preset)}", file=out)
    return EXIT_OK


def concept_defaults(preset: dict[str, Any]) -> str:
    given = [f"{key} {preset[key]}" for key in ("mix", "steps", "guidance") if preset.get(key) is not None]
    return f"  ({', '.join(given)})" if given else ""


def cmd_mixes(client: Deskgen, args: argparse.Namespace) -> int:
    mixes = client.mixes()
    if args.json:
        return print_json({"adapters": list(mixes.adapters), "named_mixes": {n: {"id": m.id, "weights": m.weights} for n, m in mixes.named_mixes.items()},
                           "default_mix": mixes.default_mix, "ab_split": mixes.ab_split, "ab_salt": mixes.ab_salt,
                           "allocation": mixes.allocation, "ab_weights": mixes.ab_weights})  # fmt: skip
    out = sys.stdout
    print(f"adapters     {', '.join(mixes.adapters)}", file=out)
    print(f"default mix  {mixes.default_mix}", file=out)
    split = " · ".join(f"{arm} {share:.0%}" for arm, share in mixes.ab_split.items()) or "off (the default mix)"
    print(f"A/B split    {split}", file=out)
    if mixes.allocation != "fixed" and mixes.ab_weights:
        weights = " · ".join(f"{arm} {share:.0%}" for arm, share in mixes.ab_weights.items())
        print(f"A/B now      {weights} ({mixes.allocation})", file=out)
    print("named mixes", file=out)
    width = max((len(n) for n in mixes.named_mixes), default=0)
    for name, mix in mixes.named_mixes.items():
        print(f"  {name:<{width}}  {mix.id}", file=out)
    return EXIT_OK


def cmd_limits(client: Deskgen, args: argparse.Namespace) -> int:
    limits = client.limits()
    if args.json:
        return print_json(limits)
    fields = limits.model_dump(mode="json")
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        print(f"{key:<{width}}  {shown}", file=sys.stdout)
    return EXIT_OK


def cmd_feedback(client: Deskgen, args: argparse.Namespace) -> int:
    result = client.feedback(args.image_id, args.event, value=args.value, user_id=args.user_id)
    if args.json:
        return print_json({"image_id": result.image_id, "event": result.event, "duplicate": result.duplicate,
                           "status": result.status})  # fmt: skip
    what = "already recorded (a repeat counts once)" if result.duplicate else "recorded"
    print(f"{result.event} {what} for image {result.image_id}", file=sys.stdout)
    return EXIT_OK


def cmd_experiments(client: Deskgen, args: argparse.Namespace) -> int:
    return print_json(client.experiment(args.experiment_id) if args.experiment_id else client.experiments())


def cmd_ready(client: Deskgen, args: argparse.Namespace) -> int:
    readiness = client.ready()
    if args.json:
        print_json(readiness)
    else:
        stages = ", ".join(f"{name} {state}" for name, state in readiness.stages.items())
        print(f"{'ready' if readiness.ready else 'NOT ready'}: {stages}", file=sys.stdout)
    return EXIT_OK if readiness.ready else EXIT_API_ERROR


# -- output -----------------------------------------------------------------------------------------


def show_result(result: GenerationResult, output: Path | None, annotated: Path | None, as_json: bool) -> int:
    path = result.save(output or Path(f"deskgen-{result.image_id}.png"))
    if annotated is not None:
        if result.annotated is not None:
            result.save_annotated(annotated)
        else:
            # The image is delivered either way: say why there is no copy, and do not fail the command.
            why = f"products {result.products.status}: {result.products.reason}" if result.products else "the server located no products"
            print(f"deskgen: no annotated image to write to {annotated} ({why})", file=sys.stderr)
            annotated = None
    if as_json:
        return print_json({**result.model_dump(mode="json", exclude={"image_b64", "annotated_b64"}), "output": str(path), **({"annotated": str(annotated)} if annotated else {})})
    out = sys.stdout
    print(f"wrote        {path} ({result.width}x{result.height} PNG, {len(result.png)} bytes)", file=out)
    print(f"image id     {result.image_id}   (deskgen feedback {result.image_id} like)", file=out)
    arm = f", arm {result.mix.arm}" if result.mix.arm else ""
    print(f"mix          {result.mix.label}, chosen by {result.mix.source}{arm}", file=out)
    print(f"seed         {result.seed}", file=out)
    print(f"steps        {result.steps}, guidance {result.guidance:g}", file=out)
    if result.desk_score is not None:
        print(f"desk score   {result.desk_score:.3f}", file=out)
    print(f"prompt       {result.prompt}", file=out)
    print(f"timings      {format_timings(result.timings)}", file=out)
    generator = result.metadata.get("timings")
    if isinstance(generator, dict) and generator:
        print(f"  generator  {format_timings(generator)}", file=out)
    if result.products is not None:
        show_products(result.products, out)
    if annotated is not None:
        print(f"annotated    {annotated}", file=out)
    return EXIT_OK


def products_headline(products: ProductLocation) -> str:
    """``2/3 found (threshold 0.1, from the request)``, or the status and its reason when not located."""
    if not products.ok:
        return f"{products.status} ({products.reason})" if products.reason else products.status
    found = f"{len(products.found_items)}/{len(products.items)} found"
    details = [f"threshold {products.threshold:g}"] if products.threshold is not None else []
    if products.source is not None:
        details.append(f"from the {products.source}")
    return f"{found} ({', '.join(details)})" if details else found


def show_products(products: ProductLocation, out: TextIO) -> None:
    """One line for the products, then each with its best box (pixels, corners) and score."""
    print(f"products     {products_headline(products)}", file=out)
    width = max((len(item.product) for item in products.items), default=0)
    for item in products.items:
        best = item.best
        if best is None:
            print(f"  {item.product:<{width}}  not found", file=out)
            continue
        x0, y0, x1, y1 = best.box
        more = f"  (+{len(item.instances) - 1} more)" if len(item.instances) > 1 else ""
        print(f"  {item.product:<{width}}  box ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) px  score {best.score:.3f}{more}", file=out)


def format_timings(timings: dict[str, Any]) -> str:
    """``{"classify_s": 0.05, "total_s": 1.2}`` -> ``classify 0.050 s · total 1.200 s``."""
    return " · ".join(f"{k.removesuffix('_s')} {float(v):.3f} s" for k, v in timings.items())


def print_json(value: Any) -> int:
    """Print JSON: a protocol model as the server wrote it, anything else as it is."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    print(json.dumps(value, indent=2, sort_keys=False), file=sys.stdout)
    return EXIT_OK


def output_path(given: str | None, *, option: str = "-o") -> Path | None:
    """Refuse an output path that cannot be written before the generation runs, not after."""
    if given is None:
        return None
    path = Path(given)
    if not path.parent.is_dir():
        raise UsageError(f"{option} {given}: the folder {str(path.parent)!r} does not exist.")
    if path.is_dir():
        raise UsageError(f"{option} {given}: is a folder; name the PNG file to write.")
    return path


def annotate_path(args: argparse.Namespace) -> Path | None:
    """Where ``--annotate`` writes the annotated copy; refused with ``--no-locate`` (nothing would be drawn)."""
    if args.annotate is not None and args.locate is False:
        raise UsageError("--annotate draws the located products: it cannot go with --no-locate.")
    return output_path(args.annotate, option="--annotate")


def product_names(text: str) -> list[str]:
    """``--products monitor,desk lamp`` -> ``["monitor", "desk lamp"]`` (the server checks each name)."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no product: give names separated by commas")
    return names


def generation_options(args: argparse.Namespace) -> GenerationKwargs:
    """The options given on the command line (argparse's ``dest`` names are the API's; ``--annotate PATH``
    asks for ``annotate``)."""
    given: dict[str, Any] = {key: getattr(args, key) for key in GenerationKwargs.__annotations__
                             if key != "annotate" and getattr(args, key) is not None}  # fmt: skip
    if args.annotate is not None:
        given["annotate"] = True
    return cast(GenerationKwargs, given)


def cmd_jobs_submit(client: Deskgen, args: argparse.Namespace) -> int:
    """Queue a text2img (a prompt) or generate (``--photo``) job; with ``--watch`` follow it to the end and
    write its images."""
    options: dict[str, Any] = dict(generation_options(args))
    batch: dict[str, list[Any]] | None = None
    for name in ("seeds", "mixes", "concepts"):
        values = getattr(args, name)
        if values:
            if batch is not None:
                raise UsageError("give one of --seeds, --mixes, --concepts")
            batch = {name: [int(v) for v in values] if name == "seeds" else list(values)}
    if (args.prompt is None) == (args.photo is None):
        raise UsageError("give a prompt, or --photo for a job from a desk photo")
    if args.photo is not None and args.style is not None:
        options["style"] = args.style
    job = client.jobs.create(
        text2img={"prompt": args.prompt, **options} if args.prompt is not None else None,
        generate=options if args.photo is not None else None, photo=args.photo, batch=batch,
        webhook=args.webhook, webhook_events=args.webhook_events or ("completed",),
        cancel_after_s=args.cancel_after, wait_s=args.wait,
    )  # fmt: skip
    if not args.watch:
        return show_job(job, args.json)
    return watch_job(client, job.id, args)


def cmd_jobs_watch(client: Deskgen, args: argparse.Namespace) -> int:
    return watch_job(client, args.job_id, args)


def cmd_jobs_get(client: Deskgen, args: argparse.Namespace) -> int:
    return show_job(client.jobs.get(args.job_id), args.json)


def cmd_jobs_cancel(client: Deskgen, args: argparse.Namespace) -> int:
    return show_job(client.jobs.cancel(args.job_id), args.json)


def watch_job(client: Deskgen, job_id: str, args: argparse.Namespace) -> int:
    """Follow a job's events (a progress bar per image on stderr), then write its images as
    ``<prefix>-<k>.png``; exit 1 unless it succeeded."""
    bar = None if args.no_progress else ProgressBar(sys.stderr)

    def show(event: JobEvent) -> None:
        if bar is None:
            return
        if event.name == "progress":
            bar.step(int(event.data["step"]), int(event.data["steps"]))
        elif event.name == "started":
            bar.line(f"job {job_id}: running, {event.data.get('images', 1)} image(s)")
        elif event.name == "image":
            bar.line(f"image {event.data['index']} done: {event.data['image_id']}")
        elif event.name == "retrying":
            bar.line(f"retrying (the service failed: {event.data.get('error', {}).get('code')})")

    job = client.jobs.wait(job_id, on_event=show)
    if job.status == "succeeded" and not args.json:
        prefix = args.output_prefix or f"deskgen-{job_id}"
        for image in job.images:
            path = Path(f"{prefix}-{image.index}.png")
            path.write_bytes(client.jobs.image(job_id, image.index))
            print(f"image {image.index}  {path}  ({image.image_id})", file=sys.stdout)
    show_job(job, args.json)
    return EXIT_OK if job.status == "succeeded" else EXIT_API_ERROR


def show_job(job: JobAnswer, as_json: bool) -> int:
    if as_json:
        return print_json(job.model_dump(mode="json"))
    line = f"job {job.id}  {job.status}"
    if job.position is not None:
        line += f"  position {job.position}"
    if job.progress:
        line += f"  image {job.progress.get('image', 0)} step {job.progress.get('step')}/{job.progress.get('steps')}"
    if job.images:
        line += f"  {len(job.images)} image(s)"
    if job.error:
        line += f"  error {job.error.get('code')}: {job.error.get('message')}"
    if job.webhook_failed:
        line += "  webhook_failed"
    print(line, file=sys.stdout)
    return EXIT_OK


class UsageError(Exception):
    """A command line that cannot work, found before any request is sent (exit status 2)."""


# -- the parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the server (default: $DESKGEN_URL or {DEFAULT_URL})")
    common.add_argument("--api-key", help="the API key, sent as Authorization: Bearer (default: $DESKGEN_API_KEY)")
    common.add_argument("--retries", type=int, default=3, metavar="N",
                        help="retries of a 429/503 answer or a refused connection, after Retry-After (default: 3)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print the JSON answer")

    generation = argparse.ArgumentParser(add_help=False)
    generation.add_argument("--mix", help="a named mix (deskgen mixes), `adapter:weight+...`, or `base`")
    generation.add_argument("--seed", type=int, help="0..2^32-1 (random and reported when omitted)")
    generation.add_argument("--steps", type=int, help="denoising steps")
    generation.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    generation.add_argument("--width", type=int, help="a multiple of 8")
    generation.add_argument("--height", type=int, help="a multiple of 8")
    generation.add_argument("--negative-prompt", help='what to avoid ("" for none)')
    generation.add_argument("--user-id", help="the user (makes the A/B arm sticky)")
    generation.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS", help="the request's deadline")
    generation.add_argument("--request-id", help="the X-Request-Id of the first attempt (the image id); retries add .r<n>")
    generation.add_argument("-o", "--output", metavar="PNG", help="where to write the image (default: deskgen-<image id>.png)")
    generation.add_argument("--no-progress", action="store_true", help="no progress on stderr (no event stream)")
    generation.add_argument("--concept", help="a concept preset (deskgen concepts), or `auto` for today's")
    generation.add_argument("--products", type=product_names, metavar="LIST",
                            help="products to find in the image, comma-separated (default: the objects the "
                                 "captions or the prompt name)")  # fmt: skip
    generation.add_argument("--no-locate", dest="locate", action="store_false", default=None,
                            help="do not look for products in the image")  # fmt: skip
    generation.add_argument("--annotate", metavar="PNG", help="also write a copy with the product boxes drawn")

    parser = argparse.ArgumentParser(prog="deskgen", description="The deskgen image service from the command line.",
                                     epilog="docs/CLIENT.md has examples.")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser("generate", parents=[common, generation], help="a desk photo -> a new desk-setup image")
    sub.add_argument("photo", type=Path, help="the desk photo (JPEG, PNG, WebP)")
    sub.add_argument("--style", help="a style concept woven into the prompt, e.g. cyberpunk")
    sub.set_defaults(run=cmd_generate)

    sub = commands.add_parser("text2img", parents=[common, generation], help="a prompt -> an image (no gate, no captions)")
    sub.add_argument("prompt")
    sub.set_defaults(run=cmd_text2img)

    sub = commands.add_parser("locate", parents=[common], help="where products are in any image (boxes, scores)")
    sub.add_argument("image", type=Path, help="the image (JPEG, PNG, WebP)")
    sub.add_argument("--products", type=product_names, required=True, metavar="LIST",
                     help="the products to find, comma-separated, e.g. monitor,keyboard,desk lamp")  # fmt: skip
    sub.add_argument("--annotate", metavar="PNG", help="also write a copy with the boxes drawn")
    sub.set_defaults(run=cmd_locate)

    sub = commands.add_parser("concepts", parents=[common], help="the concept presets and the weekly schedule")
    sub.set_defaults(run=cmd_concepts)

    sub = commands.add_parser("mixes", parents=[common], help="the adapters, named mixes and the A/B split")
    sub.set_defaults(run=cmd_mixes)

    sub = commands.add_parser("limits", parents=[common], help="the live request limits and defaults")
    sub.set_defaults(run=cmd_limits)

    sub = commands.add_parser("feedback", parents=[common], help="what the user did with an image")
    sub.add_argument("image_id", help="the image id a generation printed")
    sub.add_argument("event", choices=FEEDBACK_EVENTS)
    sub.add_argument("--value", type=float, help="optional, e.g. a rating")
    sub.add_argument("--user-id", help="must be the user the image was delivered to")
    sub.set_defaults(run=cmd_feedback)

    sub = commands.add_parser("experiments", parents=[common], help="the A/B experiments, or one's report (JSON)")
    sub.add_argument("experiment_id", nargs="?")
    sub.set_defaults(run=cmd_experiments)

    sub = commands.add_parser("ready", parents=[common], help="whether every stage answers (exit 1 when not)")
    sub.set_defaults(run=cmd_ready)

    jobs = commands.add_parser("jobs", help="asynchronous generation: submit, watch, get, cancel")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument("--output-prefix", metavar="PATH", help="images go to PATH-<k>.png (default: deskgen-<job id>)")
    sub = job_commands.add_parser("submit", parents=[common, generation, watching], help="queue a job")
    sub.add_argument("prompt", nargs="?", help="the prompt of a text2img job")
    sub.add_argument("--photo", type=Path, help="a desk photo: a generate job")
    sub.add_argument("--style", help="(with --photo) a style concept woven into the prompt")
    sub.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="a batch: one image per seed")
    sub.add_argument("--mixes", nargs="+", metavar="MIX", help="a batch: one image per mix")
    sub.add_argument("--concepts", nargs="+", metavar="CONCEPT", help="a batch: one image per concept preset")
    sub.add_argument("--webhook", metavar="URL", help="receives the job's signed events")
    sub.add_argument("--webhook-events", nargs="+", choices=("start", "progress", "completed"), metavar="EVENT",
                     help="which events go to --webhook: start, progress, completed (default: completed)")  # fmt: skip
    sub.add_argument("--cancel-after", type=float, metavar="SECONDS", help="cancel the job if it has not ended by then")
    sub.add_argument("--wait", type=int, metavar="SECONDS", help="wait that long on the server for the result (Prefer: wait)")
    sub.add_argument("--watch", action="store_true", help="follow the job to its end and write its images")
    sub.set_defaults(run=cmd_jobs_submit)
    sub = job_commands.add_parser("watch", parents=[common, watching], help="follow a job with a progress bar")
    sub.add_argument("job_id")
    sub.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    sub.set_defaults(run=cmd_jobs_watch)
    sub = job_commands.add_parser("get", parents=[common], help="a job's status")
    sub.add_argument("job_id")
    sub.set_defaults(run=cmd_jobs_get)
    sub = job_commands.add_parser("cancel", parents=[common], help="cancel a job")
    sub.add_argument("job_id")
    sub.set_defaults(run=cmd_jobs_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The client logs each retry ("... retry 1/3 in 5.0 s"): the user sees why a command waits.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("deskgen: %(message)s"))
    client_log = logging.getLogger("deskgen.client")
    client_log.addHandler(handler)
    level = client_log.level
    client_log.setLevel(logging.INFO)
    run: Callable[[Deskgen, argparse.Namespace], int] = args.run
    try:
        with Deskgen(args.url, api_key=args.api_key, max_retries=args.retries) as client:
            return run(client, args)
    except DeskgenConnectionError as error:
        return fail(error, EXIT_NO_ANSWER, args.json)
    except DeskgenError as error:
        return fail(error, EXIT_API_ERROR, args.json)
    except (UsageError, ValueError, OSError) as error:
        print(f"deskgen: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deskgen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(level)


def fail(error: DeskgenError, status: int, as_json: bool) -> int:
    """The server's message on stderr (with its status, code, field and request id); the JSON error on
    stdout with ``--json``."""
    print(f"deskgen: {error}", file=sys.stderr)
    details = [f"request id {error.request_id}"] if error.request_id else []
    if error.retry_after is not None:
        details.append(f"retry after {error.retry_after:g} s")
    if isinstance(error, Unauthorized):
        details.append("give the API key with --api-key or $DESKGEN_API_KEY")
    if details:
        print(f"deskgen: ({', '.join(details)})", file=sys.stderr)
    if as_json and error.body:
        print_json(error.body)
    return status


if __name__ == "__main__":
    sys.exit(main())
