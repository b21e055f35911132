"""Report writing, not model code: what every report shares (the machine it ran on, markdown tables, the one
percentage formatter: `reports.common`), the paper's figures (`reports.figures`) and docs/RESULTS.md
(`reports.results`). `model/` computes; this package lays the numbers out."""
