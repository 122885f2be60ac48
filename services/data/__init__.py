"""Problems and where they come from: parquet readers (vireo, MMMU, math schemas), the synthetic tasks of
the embedded default, and the per-stage data mix."""
