"""Studies: longer measurements with the package, each writing a report under docs/."""
