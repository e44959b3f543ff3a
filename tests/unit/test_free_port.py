"""``free_port`` (the one-host rendezvous port): outside the kernel's ephemeral range, so no
outgoing connection opened before the rendezvous binds it can take it (a CI run failed with
EADDRINUSE when it came from ``bind(0)``), free, and leaving the seeded ``random`` alone."""

from __future__ import annotations

import random
import socket

from pretrain.parallel.launch_env import _ephemeral_ports, free_port


def test_the_port_is_free_outside_the_ephemeral_range_and_random_is_untouched():
    low, high = _ephemeral_ports()
    random.seed(7)
    expected = random.random()
    random.seed(7)
    ports = {free_port() for _ in range(20)}
    assert random.random() == expected
    assert len(ports) > 1  # drawn, not one fixed port
    for port in ports:
        assert 1024 <= port < 65536 and not low <= port <= high
        with socket.socket() as s:
            s.bind(("", port))  # nothing holds it


def test_a_port_in_use_is_not_returned(monkeypatch):
    real, calls = random.SystemRandom.choice, []
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]

        def choice(self, seq):  # the first two draws hit the port in use
            calls.append(1)
            return taken if len(calls) <= 2 else real(self, seq)

        monkeypatch.setattr(random.SystemRandom, "choice", choice)
        assert free_port() != taken and len(calls) == 3


def test_the_in_process_group_leaves_no_rendezvous_in_the_environment(one_rank):
    """Commands that tests start inherit os.environ: a MASTER_PORT left there by the pytest
    process's own gloo group made the study test's ``pretrain.train`` fail with EADDRINUSE."""
    import os

    import torch.distributed as dist
    from conftest import RENDEZVOUS

    assert dist.is_initialized()
    assert not {k for k in RENDEZVOUS if k in os.environ}
