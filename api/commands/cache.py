"""`kawai cache [list]` and `kawai cache clear [-m ID|SHA256]`: the prompt cache's disk tier.

The disk tier ($KAWAI_HOME/kv/<model sha256>/, engine/kv_disk.py) keeps the KV blocks of prompts across
server restarts. `list` shows, per model, the block files, their size, the tenants (API token ids;
"local" with --no-auth) and when a block was last used; `clear` deletes them (all, or one model's).
Clearing while a server runs is safe: a missing block is a miss.
"""

from __future__ import annotations

from datetime import datetime

from kawai.api.commands.models import print_table
from kawai.api.commands.pull import format_size
from kawai.engine import catalog
from kawai.engine.errors import KawaiError
from kawai.engine.kv_disk import clear_blocks, list_blocks


def register(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the prompt cache kept on disk")
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.add_argument("-m", "--model", default=None, metavar="ID|SHA256",
                   help="clear only this model's blocks (a local model id, or the directory's sha256)")
    p.set_defaults(handler=_run)


def kv_dir():
    return catalog.kawai_home() / "kv"


def _run(args) -> int:
    names = catalog.local_model_ids_by_sha256()
    if args.action == "clear":
        sha = None
        if args.model is not None:
            by_id = {model_id: sha for sha, model_id in names.items()}
            sha = by_id.get(args.model.lower(), args.model.lower())
            if not catalog.SHA256_PATTERN.fullmatch(sha):
                raise KawaiError(f"no local model {args.model!r} with a recorded checksum; pass its sha256 instead")
        files, size = clear_blocks(kv_dir(), sha)
        print(f"removed {files} block files ({format_size(size)}) from {kv_dir()}")
        return 0
    models = list_blocks(kv_dir())
    if not models:
        print(f"no cached prompt blocks in {kv_dir()}")
        return 0
    rows = [(names.get(m.model_sha256, m.model_sha256[:16] + "…"), str(m.files), format_size(m.bytes),
             ", ".join(m.tenants), datetime.fromtimestamp(m.last_used).strftime("%Y-%m-%d %H:%M"))
            for m in models]
    print_table(("MODEL", "BLOCKS", "SIZE", "TENANTS", "LAST USED"), rows)
    return 0
