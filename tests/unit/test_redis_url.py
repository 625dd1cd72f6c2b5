"""Redis URLs whose password holds an unencoded '#', '?' or '/': refused without echoing the URL, and
redacted up to the last '@' wherever they are shown (cluster/state/redis_url.py)."""
from __future__ import annotations

from urllib.parse import quote

import pytest
import redis

from cluster.state.redis_url import check_url, explain_error, redact_url, scrub, url_secrets

# Each password splits where urlsplit would end the netloc; every piece must stay hidden.
PASSWORDS = ["Hunter#2xyzzy", "Hunter?2xyzzy", "Hunter/2xyzzy", "12345#2xyzzy", "Hunter#2x/y?zzy@more"]
PIECES = ("Hunter", "2xyzzy", "12345")


def visible(text: str, password: str) -> list[str]:
    return [p for p in PIECES if p in password and p in text]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("form", ["redis://:{}@db.internal:6379/0", "rediss://admin:{}@db.internal:6380/1?db=1",
                                  "redis://{}@db.internal:6379"])
def test_unencoded_separators_never_leak(password, form):
    url = form.format(password)
    with pytest.raises(ValueError) as info:
        check_url(url)
    message = str(info.value)
    assert "cannot be parsed" in message and "%23" in message  # what to do about it
    assert not visible(message, password) and "db.internal" not in message  # the URL is not echoed at all
    shown = redact_url(url)
    assert not visible(shown, password), shown
    assert "***@" in shown
    # whatever a client library says about it is scrubbed too
    error = redis.ConnectionError(f"Error connecting with password {password} to db.internal")
    assert not visible(explain_error(error, url), password)
    assert not visible(scrub(f"{url} {password}", url_secrets(url)), password)


@pytest.mark.parametrize("password", PASSWORDS)
def test_the_same_passwords_percent_encoded_are_accepted_and_redacted(password):
    url = f"redis://:{quote(password, safe='')}@db.internal:6379/0"
    check_url(url)
    assert redact_url(url) == "redis://:***@db.internal:6379/0"
    assert password in url_secrets(url)


def test_redaction_runs_to_the_last_at():
    # an '@' in a query value is taken for part of the userinfo: over-redacted, never under
    assert redact_url("redis://:pw@h:6379/0?client_name=a@b") == "redis://:***@b"
    assert redact_url("redis://user:p@ss@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://h:6379/0?password=s3cret") == "redis://h:6379/0?password=***"
