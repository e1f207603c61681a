"""`kawai serve` start-up safety: no open API on the network by accident, no token in captured output."""

from __future__ import annotations

import stat

from kawai.api.commands.serve import FIRST_TOKEN_FILE, _first_token
from kawai.api.state import ServerSettings
from kawai.api.api_keys import TokenStore
from test_server_cli import kawai


def test_no_auth_on_a_public_address_needs_its_own_flag(tmp_path):
    p = kawai("serve", "--no-auth", "--host", "0.0.0.0", "-m", "/nonexistent/model.gguf", home=tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "--no-auth-on-network" in err and "Traceback" not in err
    # with the flag, start-up goes on (and stops at the missing model)
    p = kawai("serve", "--no-auth", "--no-auth-on-network", "--host", "0.0.0.0", "-m", "/nonexistent/model.gguf",
              home=tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "does not exist" in err


def test_the_first_token_goes_to_a_private_file_when_output_is_not_a_terminal(tmp_path, capsys):
    _first_token(ServerSettings(home=tmp_path))  # pytest's captured stdout is not a terminal
    printed = capsys.readouterr().out
    path = tmp_path / FIRST_TOKEN_FILE
    secret = path.read_text().strip()
    assert secret.startswith("kawai-") and secret not in printed and str(path) in printed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (rec,) = TokenStore(tmp_path).list()
    assert TokenStore(tmp_path).authenticate(secret).id == rec.id
