"""Command-line programs: ``pvt-train``, ``pvt-evaluate``, ``pvt-predict``, ``pvt-convert``, ``pvt-export``."""
