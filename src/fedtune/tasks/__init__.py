"""Tasks: loading raw text-classification / regression data (:mod:`fedtune.tasks.data`)
and the official GLUE-style metrics (:mod:`fedtune.tasks.metrics`)."""
