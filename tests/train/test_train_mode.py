"""``set_training`` has the effect of ``Module.train(mode)`` on every submodule."""
from torch import nn

from rtdmd.train.rl_rollout import set_training


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def train(self, mode: bool = True):
        self.calls += 1
        return super().train(mode)


def test_set_training_flips_every_submodule_and_respects_train_overrides():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 1)))
    for mode in (False, True, False):
        set_training(net, mode)
        assert all(m.training is mode for m in net.modules())
    custom = nn.Sequential(nn.Linear(2, 2), _Custom())
    set_training(custom, False)
    assert custom[1].calls == 1 and not any(m.training for m in custom.modules())
