"""A kernel whose replies are small on the wire and huge once decoded, for
``tests/supervisor/test_decode_bound.py`` (loaded by import string, ``"tests.amplifier:make"``).

msgspec encodes ``[[]] * n`` as n + 5 bytes (one ``0x90`` per empty list); the supervisor
would decode it into n lists of 56 bytes each and a slot for each. The kernel itself holds
only n pointers to one list.
"""

from __future__ import annotations

from typing import Any

from tests.kernels import Kernel


class AmplifierKernel(Kernel):
    def empty_lists(self, n: int) -> list[list[Any]]:
        return [[]] * n

    def empty_dicts_in_lists(self, n: int) -> list[list[dict[str, Any]]]:
        return [[{}, {}, {}]] * n


def make(tenant: str) -> AmplifierKernel:
    return AmplifierKernel(tenant)
