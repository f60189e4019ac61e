"""The README's Python examples run as written."""

import re
import textwrap
from pathlib import Path

import torch
from torch.utils.data import DataLoader

README = Path(__file__).parent.parent / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 8
    compile(blocks[4], "README resume example", "exec")  # a fragment: it uses the names above
    for fragment in blocks[6:]:  # ShardedIterable and sample_generator fragments: they use names of your own
        compile(textwrap.dedent(fragment), "README data example", "exec")
    lengths = [1 + i % 3 for i in range(30)]
    buckets: dict = {"torch": torch, "DataLoader": DataLoader, "lengths": lengths,
                     "dataset": torch.utils.data.TensorDataset(torch.arange(30))}
    exec(textwrap.dedent(blocks[5]).replace("max_tokens=4096", "max_tokens=6"), buckets)  # the length-bucketing recipe
    batches = list(buckets["LengthBuckets"](lengths, max_tokens=6))
    assert sorted(i for b in batches for i in b) == list(range(30))
    assert all(len({lengths[i] for i in b}) == 1 and len(b) * lengths[b[0]] <= 6 for b in batches)
    namespace: dict = {}
    exec(blocks[0], namespace)
    assert namespace["trainer"].global_step > 0
    assert torch.isfinite(namespace["trainer"].callback_metrics["val_loss"])
    exec(blocks[1], namespace)
    namespace["trainer"].fit(namespace["Regressor"](), DataLoader(namespace["data"], batch_size=64))
    assert namespace["trainer"].global_step == 3 * 2 * 16
    exec(blocks[2], namespace)  # callbacks and loggers
    namespace["trainer"].fit(namespace["Regressor"](), DataLoader(namespace["data"], batch_size=64))
    assert "lr-AdamW" in namespace["trainer"].callback_metrics
    assert (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert any((tmp_path / "logs" / "tb" / "version_0").glob("events.out.tfevents.*"))
    exec(blocks[3], namespace)  # the FSDP example builds its Trainer (fitting needs ranks)
    assert type(namespace["trainer"].strategy).__name__ == "FSDPStrategy"
    assert namespace["trainer"].strategy.shard_modules == (torch.nn.TransformerEncoderLayer,)
