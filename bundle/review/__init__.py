"""Blinded pathologist review of synthetic H&E patches: export a review kit, score the reviewers' answers.

Modules:

- :mod:`bundle.review.kit`: ``export_review_kit`` mixes ``num`` real and ``num`` generated patches under random names
  into a kit folder with a self-contained page (``page.html``, package data, filled in by ``render_review_page``) on
  which a reviewer calls every patch "Real" or "Synthetic"; which patch is which goes only to the key file, kept
  outside the kit. It also defines the key and answers formats.
- :mod:`bundle.review.scoring`: ``score_answers`` reads the key and the answers files and reports per reviewer
  accuracy, sensitivity, specificity, a one-sided exact binomial test against guessing, confidence and
  tissue-feature means, and between reviewers Cohen's and Fleiss' kappa; ``format_report`` renders it as text.

See docs/review_kit.md.
"""

from bundle.review import scoring
from bundle.review.kit import DEFAULT_FEATURES, IMAGE_SUFFIXES, export_review_kit, list_images, render_review_page
from bundle.review.scoring import (
    cohen_kappa,
    fleiss_kappa,
    format_report,
    kappa_label,
    load_answers,
    load_key,
    ratings_table,
    score_answers,
    write_report,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "DEFAULT_FEATURES",
    "list_images",
    "export_review_kit",
    "render_review_page",
    *scoring.__all__,
]
