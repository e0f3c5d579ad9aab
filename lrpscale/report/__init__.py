"""The report: figures (heatmaps, critical-path graphs, k curves, deconvolutions), the reducer's
class pictures, and the self-contained HTML page.

Rule: reads results (and decodes input pictures through ``lrpscale.inputs``) and draws with
matplotlib; no torch.
"""
