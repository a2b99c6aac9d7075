"""The built-in digits task: 8x8 handwritten digits (scikit-learn's bundled ``load_digits``)."""
