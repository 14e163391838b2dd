"""The constants of the conv rule's plan (:func:`gradscore.engines.rules.conv.plan`): what
each form's work costs, in multiply-adds of a GEMM. ``python -m bench.conv_plan`` times
every form on a set of conv layers and prints where the plan's pick is slower than the
fastest form; refit these when it says so (bench/README.md has the last fit)."""

#: one element of a strided elementwise pass (an im2col copy, a shifted sum)
ELEMENTWISE_COST = 16
#: the grouped form (one convolution per example, no patches) per multiply-add
GROUPED_COST = 1.2
#: the same with fewer than FEW_INPUTS input channels per group (oneDNN runs it slowly)
GROUPED_FEW_INPUTS_COST = 2 * GROUPED_COST
FEW_INPUTS = 4
#: the sparse form on long rows: per multiply-add with a non-zero δ
SPARSE_MAC_COST = 0.64
#: ... per element of δ (listing it)
SPARSE_DELTA_COST = 23
#: ... per listed δ
SPARSE_LISTED_COST = 34
#: ... per patch row copied
SPARSE_PATCH_COST = 24
#: ... per weight (the sums' results and the norm)
SPARSE_WEIGHT_COST = 2.4
#: the sparse form on short rows (dense): per multiply-add
SHORT_MAC_COST = 0.21
#: ... per patch value copied
SHORT_COPY_COST = 0.2
#: ... per weight (one dot product each)
SHORT_WEIGHT_COST = 8.7
#: the sparse form, both row kinds: per element of the padded input (the thread's copy)
SPARSE_PIXEL_COST = 18
#: δ's density is measured on at most this many examples
DENSITY_SAMPLE = 16
