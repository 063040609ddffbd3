"""The programs users run, as ``mpilayer <command>`` (installed as ``mpilayer.jobs``)."""
