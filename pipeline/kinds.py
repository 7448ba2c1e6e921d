"""The kinds of stored sample (section 4.4 / 5.1): every source training example is stored once clean and once
per training attack, in this order, so a shard of S examples holds ``N_KINDS * S`` samples and the activations'
row ``N_KINDS * e + k`` is kind ``k`` of example ``e``. A module of its own (no torch) so the config can count
with it."""
KINDS = ("clean", "fgsm_half", "fgsm", "pgd_half", "pgd")
N_KINDS = len(KINDS)
