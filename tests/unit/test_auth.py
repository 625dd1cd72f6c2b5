"""Client-API bearer tokens: loading, constant-time comparison, messages that echo nothing (no cluster)."""
from __future__ import annotations

import argparse
import logging

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.serving import auth
from router_service.serving.auth import (
    MALFORMED,
    MISSING,
    WRONG,
    AuthError,
    TokenAuth,
    TokenSourceError,
    digest,
    parse_token_file,
    parse_token_list,
    read_client_token,
    read_token_file,
    read_tokens,
)

A, B, C = "tok-A-0123456789abcdef", "tok-B-0123456789abcdef", "tok-C-0123456789abcdef"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {token}")]


# ---- token sources ----

def test_token_file_skips_comments_and_blanks():
    text = f"# accepted tokens\n\n  {A}  \n# {B} is revoked\n{C}\n"
    assert parse_token_file(text) == [A, C]


def test_env_list_is_comma_separated():
    assert parse_token_list(f" {A}, ,{B} ,") == [A, B]


@pytest.mark.parametrize("bad, why", [("short-token", "at least 16 characters"),
                                      ("has a space in the middle!", "without spaces or commas"),
                                      ("caf\u00e9-0123456789abcdef", "printable ASCII")])
def test_a_bad_token_is_refused_by_line_without_echoing_it(bad, why):
    with pytest.raises(TokenSourceError, match=why) as info:
        parse_token_file(f"{A}\n# comment\n{bad}\n", "tokens.txt")
    assert "tokens.txt, line 3" in str(info.value) and bad not in str(info.value)


def test_read_tokens_from_file_and_env(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(f"{A}\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="router_service.serving.auth"):
        assert read_tokens(path, "MOE_TOKENS", {"MOE_TOKENS": f"{B},{C}"}) == [A, B, C]
    assert "readable by group or others" in caplog.text and A not in caplog.text
    path.chmod(0o600)
    assert read_tokens(path, "MOE_TOKENS", {}) == [A]  # an unset variable adds nothing
    assert read_tokens(None, None, {}) == []
    with pytest.raises(TokenSourceError, match="does not exist"):
        read_token_file(tmp_path / "missing")


def test_client_token_file_holds_exactly_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text(f"# mine\n{A}\n")
    two.write_text(f"{A}\n{B}\n")
    assert read_client_token(one) == A
    with pytest.raises(TokenSourceError, match="holds 2 tokens"):
        read_client_token(two)


def test_from_sources_is_off_without_a_source_and_fails_closed_with_one(tmp_path):
    assert TokenAuth.from_sources() is None
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(TokenSourceError, match="no token was given"):
        TokenAuth.from_sources(file=str(empty))
    with pytest.raises(TokenSourceError, match=r"\$MOE_TOKENS, which is unset"):
        TokenAuth.from_sources(env_var="MOE_TOKENS", environ={})
    with pytest.raises(TokenSourceError, match="64 lowercase hex"):
        TokenAuth.from_sources(["not-a-digest"])
    both = TokenAuth.from_sources([digest(A)], env_var="MOE_TOKENS", environ={"MOE_TOKENS": B})
    assert len(both) == 2
    both.check(bearer(A))
    both.check(bearer(B))


# ---- checking a call ----

def test_check_accepts_each_token_and_refuses_the_rest():
    checker = TokenAuth.from_tokens([A, B])
    checker.check(bearer(A))
    checker.check(bearer(B))
    checker.check([("authorization", f"bearer {A}")])  # the scheme is case-insensitive (RFC 6750)
    checker.check([("authorization", f"Bearer {A}".encode())])
    cases = [([], MISSING), ([("x-other", A)], MISSING), (bearer(C), WRONG), (bearer(A + "x"), WRONG),
             ([("authorization", A)], MALFORMED), ([("authorization", f"Basic {A}")], MALFORMED),
             ([("authorization", "Bearer")], MALFORMED), ([("authorization", f"Bearer {A} {B}")], MALFORMED),
             (bearer(A) + bearer(B), MALFORMED)]  # two authorization entries: ambiguous, refused
    for metadata, message in cases:
        with pytest.raises(AuthError) as info:
            checker.check(metadata)
        assert info.value.message == message and info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_every_digest_is_compared_whichever_matches(monkeypatch):
    """No early exit: the number and length of comparisons do not depend on the token presented."""
    seen: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    checker = TokenAuth.from_tokens([A, B, C])
    for presented in (A, C, "no-such-token-0123456789", "x" * 500):
        seen.clear()
        try:
            checker.check(bearer(presented))
        except AuthError:
            pass
        assert seen == [(32, 32)] * 3, presented


def test_fingerprint_names_the_set_not_a_token():
    one, same, other = TokenAuth.from_tokens([A, B]), TokenAuth.from_tokens([B, A, A]), TokenAuth.from_tokens([A])
    assert one.fingerprint == same.fingerprint != other.fingerprint and len(one) == len(same) == 2
    assert all(t not in one.fingerprint and digest(t) not in one.fingerprint for t in (A, B))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
def test_any_presented_value_is_refused_with_a_fixed_message(presented):
    checker = TokenAuth.from_tokens([A, B])
    for metadata in (bearer(presented), [("authorization", presented)]):
        try:
            checker.check(metadata)
        except AuthError as e:
            assert e.message in (MISSING, MALFORMED, WRONG)  # constants: nothing of the caller's echoed
        else:  # accepted: then it carried one of the tokens
            assert A in presented or B in presented


# ---- where the tokens come from: moectl serve, RouterConfig, moectl's client flags ----

def test_moectl_serve_passes_digests_only(tmp_path):
    from cluster.deploy.serve_cmd import api_token_digests

    path = tmp_path / "tokens"
    path.write_text(f"{A}\n{B}\n")
    assert api_token_digests(str(path), {"ELASTICMOE_API_TOKENS": f"{C},{A}"}) == sorted(map(digest, (A, B, C)))
    assert api_token_digests(None, {}) == []
    with pytest.raises(TokenSourceError, match="--api-tokens-file is empty"):
        api_token_digests("", {})
    path.write_text("# none\n")
    with pytest.raises(TokenSourceError, match="holds no token"):
        api_token_digests(str(path), {})


def test_router_config_auth_fields():
    from router_service.serving.router_config import RouterConfig

    base = {"checkpoint": "unused", "placement": '{"version": 0, "groups": [], "replicas": []}'}
    config = RouterConfig.from_dict({**base, "api_token_sha256": [digest(A)], "api_tokens_env": "MOE_TOKENS"})
    assert config.api_token_sha256 == (digest(A),) and hash(config)
    with pytest.raises(ValueError, match="api_tokens_env must name an environment variable"):
        RouterConfig.from_dict({**base, "api_tokens_env": "not a name"})
    with pytest.raises(ValueError, match="api_token_sha256 must be a list"):
        RouterConfig.from_dict({**base, "api_token_sha256": digest(A)})
    with pytest.raises(ValueError, match="64 lowercase hex"):
        RouterConfig.from_dict({**base, "api_token_sha256": [A]})  # a token where its digest belongs


def test_no_auth_is_a_setting_never_an_empty_or_missing_one(monkeypatch):
    """An empty api_tokens_file once turned authentication off without a word. Now: empty sources are
    refused, and a router with no source refuses to start unless allow_unauthenticated says so."""
    from router_service.serving.router_config import RouterConfig

    base = {"checkpoint": "unused", "placement": '{"version": 0, "groups": [], "replicas": []}'}
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="api_tokens_file must be the path of a token file"):
            RouterConfig.from_dict({**base, "api_tokens_file": empty})
        with pytest.raises(TokenSourceError, match="api_tokens_file is empty"):
            TokenAuth.from_sources(file=empty)
    with pytest.raises(TokenSourceError, match="api_tokens_env is empty"):
        TokenAuth.from_sources(env_var="")
    with pytest.raises(TokenSourceError, match="no token source.*allow_unauthenticated: true"):
        RouterConfig.from_dict(base).client_auth()
    assert RouterConfig.from_dict({**base, "allow_unauthenticated": True}).client_auth() is None
    with pytest.raises(ValueError, match="remove one of them"):
        RouterConfig.from_dict({**base, "allow_unauthenticated": True, "api_tokens_env": "MOE_TOKENS"})
    with pytest.raises(ValueError, match="allow_unauthenticated must be true or false"):
        RouterConfig.from_dict({**base, "allow_unauthenticated": "yes"})
    monkeypatch.setenv("MOE_TOKENS", A)
    assert len(RouterConfig.from_dict({**base, "api_tokens_env": "MOE_TOKENS"}).client_auth()) == 1
    monkeypatch.delenv("MOE_TOKENS")
    with pytest.raises(TokenSourceError, match=r"\$MOE_TOKENS, which is unset"):
        RouterConfig.from_dict({**base, "api_tokens_env": "MOE_TOKENS"}).client_auth()

    from cluster.deploy.serve_app import _EMPTY_PLACEMENT, AppArgs, AppArgsError

    for router, match in (({}, "no token source"), ({"api_tokens_file": ""}, "api_tokens_file")):
        args = AppArgs.from_dict({"checkpoint": "/c", "num_groups": 1, "router": router})
        with pytest.raises(AppArgsError, match=match):  # serveConfigV2 fails before anything starts
            args.router_config(_EMPTY_PLACEMENT, "redis://r:6379/0", "ns")


def client_args(**flags) -> argparse.Namespace:
    from cluster.deploy.connect import add_client_arguments

    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def test_moectl_client_flags(tmp_path):
    from cluster.deploy.connect import client_options

    token_file = tmp_path / "token"
    token_file.write_text(f"{A}\n")
    assert client_options(client_args(), {}) == {"token": None, "tls": False, "tls_server_name": None}
    assert client_options(client_args(), {"ELASTICMOE_API_TOKEN": B})["token"] == B
    assert client_options(client_args(token_file=token_file), {"ELASTICMOE_API_TOKEN": B})["token"] == A
    assert client_options(client_args(tls=True), {})["tls"] is True
    assert client_options(client_args(tls_ca="ca.pem", tls_server_name="moe.test"), {}) == \
        {"token": None, "tls": "ca.pem", "tls_server_name": "moe.test"}
    assert client_options(client_args(tls_cert="c.pem", tls_key="k.pem"), {})["tls"] == (None, "c.pem", "k.pem")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        client_options(client_args(tls_cert="c.pem"), {})
