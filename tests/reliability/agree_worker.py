"""Run under torchrun with 2 gloo ranks by test_errors_agree: ``agree`` turns an error one rank sees
into the same error on every rank (a clean one) or a quiet PeerFailed (a crash), never a hang."""

import datetime

import torch.distributed as dist

from model.config import ConfigError
from train.errors import PeerFailed, agree


def fails_on_rank_1(kind):
    if dist.get_rank() == 1:
        raise kind("only rank 1 sees this")
    return "fine"


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    assert agree(lambda: rank) == rank  # no error: each rank's own result

    try:
        agree(fails_on_rank_1, ConfigError)
        raise AssertionError("no error raised")
    except ConfigError as err:
        assert str(err) == "only rank 1 sees this" and err.origin_rank == 1

    try:
        agree(fails_on_rank_1, KeyError)
        raise AssertionError("no error raised")
    except KeyError:
        assert rank == 1  # the crashing rank keeps its own exception (and traceback)
    except PeerFailed as err:
        assert rank == 0 and "rank 1 failed (KeyError" in str(err)
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    main()
