"""Report writing, not model code: what every report shares (the machine it ran on, markdown tables, the number
and percentage formatters: `reports.common`), what the command line prints (`reports.terminal`), the evaluation
report's files and summary (`reports.evaluation`), the paper's figures (`reports.figures`) and docs/RESULTS.md
(`reports.results`). `model/` computes; this package lays the numbers out."""
