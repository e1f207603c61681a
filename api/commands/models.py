"""`kawai models [--catalog]`: the local models (id, size, architecture, quantization, context length)."""

from __future__ import annotations

from kawai.api.commands.pull import format_size
from kawai.engine import catalog


def register(sub) -> None:
    p = sub.add_parser("models", help="list local models")
    p.add_argument("--catalog", action="store_true", help="list the built-in catalog instead")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    if args.catalog:
        local = {m.id for m in catalog.list_local_models()}
        rows = [(e.id, format_size(e.size), "yes" if e.id in local else "no", e.description)
                for e in catalog.CATALOG.values()]
        print_table(("ID", "SIZE", "LOCAL", "DESCRIPTION"), rows)
        return 0
    models = catalog.list_local_models()
    if not models:
        print(f"no local models; `kawai pull` fetches the default ({catalog.DEFAULT_MODEL_ID})")
        return 0
    rows = []
    for m in models:
        if m.problem:
            rows.append((m.id, format_size(m.size), "-", "-", "-", m.problem))
        else:
            context = str(m.context_length) if m.context_length is not None else "?"
            rows.append((m.id, format_size(m.size), m.architecture, m.quantization, context, ""))
    print_table(("ID", "SIZE", "ARCH", "QUANT", "CONTEXT", ""), rows)
    return 0


def print_table(header: tuple[str, ...] | None, rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart; empty trailing cells are dropped. No header if None."""
    lines = ([header] if header else []) + list(rows)
    if not lines:
        return
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
