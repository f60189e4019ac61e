"""RichModelSummary: the model summary as a rich table, as Lightning's."""

from __future__ import annotations

from typing import Any

from distloop.callbacks.model_summary import ModelSummary, human_count
from distloop.extras import require

_RIGHT_ALIGNED = {"Params", "Params per Device", "FLOPs", "In sizes", "Out sizes"}


class RichModelSummary(ModelSummary):
    """The same summary as ``ModelSummary`` (to stderr), drawn as a rich table; needs the ``rich`` extra.

    ``summarize_kwargs``: ``header_style`` (Lightning's, default ``"bold magenta"``)."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        require("rich", "rich", "RichModelSummary")
        super().__init__(max_depth, **summarize_kwargs)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for title, _ in summary_data:
            table.add_column(title, justify="right" if title in _RIGHT_ALIGNED else "left",
                             style="dim" if title == " " else None, no_wrap=title == "Name")
        for row in zip(*(values for _, values in summary_data)):
            table.add_row(*row)
        totals = [
            ("Trainable params", f"{human_count(trainable_parameters):<10}"),
            ("Non-trainable params", f"{human_count(total_parameters - trainable_parameters):<10}"),
            ("Total params", f"{human_count(total_parameters):<10}"),
            ("Total estimated model params size (MB)", f"{model_size:<10,.3f}"),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
            ("Total FLOPs", human_count(total_flops)),
        ]
        console = Console(stderr=True)
        console.print(table)
        console.print("\n".join(f"[bold]{label}[/]: {value}" for label, value in totals), highlight=False)
