"""`kawai inspect FILE_OR_ID [--metadata]`: what a GGUF file holds, read from its header only.

Prints the architecture and key metadata, then one row per tensor (name, type, shape in NumPy order —
outermost first, the reverse of GGUF's dims — and bytes). A malformed file is one line on stderr, exit 2.
"""

from __future__ import annotations

from kawai.api.commands.models import print_table
from kawai.api.commands.pull import format_size
from kawai.engine import catalog
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFFile, GGUFValueType, MetadataField, open_gguf

MAX_VALUE_CHARS = 80


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a GGUF file's metadata and tensors")
    p.add_argument("model", metavar="FILE_OR_ID", help="a local model id or a path to a .gguf file")
    p.add_argument("--metadata", action="store_true", help="also print every metadata key")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    path = catalog.resolve_model(args.model)
    try:
        gguf = open_gguf(path)
    except OSError as e:
        raise KawaiError(f"cannot read {args.model}: {e.strerror or e}") from None
    print_table(None, summary(gguf))
    if args.metadata:
        print()
        print_table(("KEY", "TYPE", "VALUE"),
                    [(k, _type_name(f), format_value(f)) for k, f in gguf.fields.items()])
    print()
    rows = [
        (t.name, t.ggml_type.name, " x ".join(map(str, t.shape)), str(t.n_bytes))
        for t in sorted(gguf.tensors.values(), key=lambda t: t.offset)
    ]
    print_table(("TENSOR", "TYPE", "SHAPE", "BYTES"), rows)
    return 0


def summary(gguf: GGUFFile) -> list[tuple[str, str]]:
    """(label, value) pairs for the facts people look for first."""
    arch = gguf.architecture
    fields = gguf.fields

    def show(key: str) -> str:
        if key not in fields:
            return "-"
        f = fields[key]
        return f.value if f.value_type == GGUFValueType.STRING else format_value(f)

    if f"{arch}.vocab_size" in fields:
        vocab = show(f"{arch}.vocab_size")
    elif "tokenizer.ggml.tokens" in fields:
        vocab = str(len(fields["tokenizer.ggml.tokens"].value))
    else:
        vocab = "-"
    template = fields.get("tokenizer.chat_template")
    has_template = template is not None and template.value_type == GGUFValueType.STRING
    n_params = sum(t.n_elements for t in gguf.tensors.values())
    return [
        ("file", f"{gguf.path.name} ({format_size(gguf.file_size)}, GGUF v{gguf.version})"),
        ("architecture", arch),
        ("name", show("general.name")),
        ("quantization", catalog.quantization_name(gguf)),
        ("parameters", f"{n_params / 1e6:.1f}M in {len(gguf.tensors)} tensors"),
        ("vocab size", vocab),
        ("context length", show(f"{arch}.context_length")),
        ("layers", show(f"{arch}.block_count")),
        ("embedding length", show(f"{arch}.embedding_length")),
        ("feed forward length", show(f"{arch}.feed_forward_length")),
        ("heads", show(f"{arch}.attention.head_count")),
        ("kv heads", show(f"{arch}.attention.head_count_kv")),
        ("rope base", show(f"{arch}.rope.freq_base")),
        ("chat template", f"yes ({len(template.value)} chars)" if has_template else "no"),
    ]


def _type_name(field: MetadataField) -> str:
    if field.element_type is not None:
        return f"{field.element_type.name}[{len(field.value)}]"
    return field.value_type.name


def format_value(field: MetadataField) -> str:
    """A value on one line: strings quoted and cut, arrays summarized."""
    v = field.value
    if field.value_type == GGUFValueType.STRING:
        text = repr(v)
    elif field.element_type is not None:
        items = list(v[:8])
        shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items)
        text = f"[{shown}{', ...' if len(v) > 8 else ''}] ({len(v)} items)"
    else:
        text = str(v)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
