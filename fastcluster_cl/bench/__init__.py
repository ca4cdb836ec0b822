"""Measurement tools: `runner` times the losses against their peers and floors (``fastcluster-cl
bench``), `static_report` reads the compiled sm_90a code of every Triton kernel without a GPU
(``python -m fastcluster_cl.bench static``)."""
