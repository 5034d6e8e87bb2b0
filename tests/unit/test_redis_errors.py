"""Which Redis answers are a message's data error and which are Redis being unavailable (DESIGN §10)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from billingd.clients.errors import DownstreamRejected, DownstreamUnavailable
from billingd.clients.ledger.base import classify

MISCONF = (
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
    "Commands that may modify the data set are disabled"
)

UNAVAILABLE = [
    MISCONF,
    MISCONF + " script: 88c9238, on @user_script:1.",  # raised inside a Lua script
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "NOREPLICAS Not enough good replicas to write.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "CLUSTERDOWN The cluster is down",
    "NOAUTH Authentication required.",
    "WRONGPASS invalid username-password pair or user is disabled.",
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "ERR max number of clients reached",
]
DATA = [
    "ERR value is not an integer or out of range",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR Error running script (call to f_1): @user_script:3: user_script:3: attempt to compare nil with number",
    "ERR increment or decrement would overflow",
]


@pytest.mark.parametrize("reply", UNAVAILABLE)
def test_an_answer_about_the_server_is_unavailability(reply):
    error = classify(ResponseError(reply))
    assert isinstance(error, DownstreamUnavailable), reply
    assert error.downstream == "redis"


@pytest.mark.parametrize("reply", DATA)
def test_an_answer_about_the_data_is_a_rejection(reply):
    assert isinstance(classify(ResponseError(reply)), DownstreamRejected), reply


def test_the_detail_names_the_fix_where_redis_said_why():
    assert "fix: Redis cannot persist" in classify(ResponseError(MISCONF)).detail
    assert "fix: billingd is talking to a replica" in classify(ResponseError("READONLY replica")).detail
    assert "fix:" not in classify(RedisConnectionError("Connection refused")).detail
    assert isinstance(classify(DataError("cannot encode")), DownstreamRejected)
