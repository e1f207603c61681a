"""`kawai tokens create|list|revoke`: manage API tokens in $KAWAI_HOME/tokens.json.

    kawai tokens create --name laptop --endpoints messages,count_tokens,models [--limit 1000/day]
    kawai tokens list
    kawai tokens revoke tok_…

A new token is printed once; only its SHA-256 hash is stored. A running server picks up changes.
"""

from __future__ import annotations

from kawai.api.api_keys import DEFAULT_ENDPOINTS, ENDPOINTS, Limit, TokenStore, parse_endpoints


def register(sub) -> None:
    p = sub.add_parser("tokens", help="create, list and revoke API tokens")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a token (shown once)")
    create.add_argument("--name", required=True, help="a label for the token")
    create.add_argument("--endpoints", default=",".join(DEFAULT_ENDPOINTS),
                        help=f"comma-separated grants from {','.join(ENDPOINTS)} "
                             f"(default: {','.join(DEFAULT_ENDPOINTS)}; `metrics` shows every token's traffic)")
    create.add_argument("--limit", metavar="N/day|N/month", help="request quota (default: none)")
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", help="list tokens (ids and prefixes, never secrets)")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="delete a token by id")
    revoke.add_argument("token_id", metavar="ID")
    revoke.set_defaults(handler=_revoke)


def _store() -> TokenStore:
    from kawai.engine.catalog import kawai_home

    return TokenStore(kawai_home())


def _create(args) -> int:
    limit = Limit.parse(args.limit) if args.limit else None
    rec, secret = _store().create(args.name, parse_endpoints(args.endpoints), limit)
    print(f"Created token {rec.id} ({rec.name}) for {', '.join(rec.endpoints)}"
          + (f", limit {rec.limit}" if rec.limit else "") + ". It is shown only this once:\n")
    print(f"    {secret}\n")
    return 0


def _list(args) -> int:
    records = _store().list()
    if not records:
        print("no tokens (create one with `kawai tokens create --name NAME`)")
        return 0
    rows = [("ID", "NAME", "PREFIX", "ENDPOINTS", "LIMIT", "CREATED")]
    for r in records:
        rows.append((r.id, r.name, r.prefix + "…", ",".join(r.endpoints), str(r.limit or "-"), r.created_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _revoke(args) -> int:
    rec = _store().revoke(args.token_id)
    print(f"Revoked token {rec.id} ({rec.name}).")
    return 0
