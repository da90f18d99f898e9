"""Load raw text-classification / regression data into plain Python lists.

:func:`load_task_data` resolves a :class:`~fedtune.config.DataConfig` in this order:

1. **Local files** — ``data.dataset = "files"`` or ``data.train_file`` set. ``train_file`` and
   ``eval_file`` are read by extension with pandas / pyarrow (not ``datasets``):

   - ``.csv``: comma-separated with a header row, standard CSV quoting;
   - ``.tsv``: tab-separated with a header row, **no quote handling** (``csv.QUOTE_NONE``, as
     the GLUE TSVs need: a ``"`` is an ordinary character);
   - ``.json``: a JSON array of objects, an object of columns, an object with a single list of
     records (``{"data": [...]}``), or JSON lines;
   - ``.jsonl`` / ``.ndjson``: one JSON object per line;
   - ``.parquet`` / ``.pq``: via pyarrow.

   All cells of CSV/TSV are read as strings (``"NA"`` stays text). The text column is
   ``data.text_column`` (default ``"text"``), the optional pair column ``data.text_pair_column``,
   the label column ``data.label_column`` (default ``"label"``). Labels map through
   ``data.label_names`` when given (matched by name; integer labels are taken as indices only
   when no name looks like an integer), else through the sorted set of training labels
   (numerically sorted when all labels are integers). ``data.regression = true`` reads float
   labels. The eval split is called ``"eval"``.
2. **A known task in FEDTUNE_DATA_DIR** — GLUE (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte,
   wnli) or ag_news, when ``$FEDTUNE_DATA_DIR/<name>/`` exists (the GLUE download script's folder
   names such as ``SST-2`` or ``CoLA`` are accepted too). GLUE: ``train.tsv`` and ``dev.tsv``
   (eval split ``"validation"``; MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv`` ->
   ``"validation_matched"`` / ``"validation_mismatched"``). GLUE ``test.tsv`` files carry no
   labels and are never used. See :func:`~fedtune.tasks.data.local_layouts._load_ag_news_local` for AG News.
3. **The Hugging Face hub** — ``nyu-mll/glue`` (config = task) for GLUE names,
   ``fancyzhx/ag_news`` for ag_news, else ``data.dataset`` itself as the dataset id. Failure to
   load is reported as a :class:`DataError` that names the id.

Subsetting: ``data.train_size > 0`` keeps a seeded subset of that many training rows,
stratified by label (plain random for regression); ``data.eval_size > 0`` keeps a seeded random
subset of every eval split. Subsets keep the original row order. A size larger than the split
simply keeps every row (no error).
"""

from __future__ import annotations

from fedtune.tasks.data.containers import DataError, TaskData, TextDataset
from fedtune.tasks.data.files import read_json_lines
from fedtune.tasks.data.known_tasks import GLUE_TASKS, TASKS
from fedtune.tasks.data.load import load_task_data
from fedtune.tasks.data.local_layouts import data_dir
from fedtune.tasks.data.subsets import seeded_rng, stratified_indices

__all__ = [
    "DataError",
    "GLUE_TASKS",
    "TASKS",
    "TaskData",
    "TextDataset",
    "data_dir",
    "load_task_data",
    "read_json_lines",
    "seeded_rng",
    "stratified_indices",
]
