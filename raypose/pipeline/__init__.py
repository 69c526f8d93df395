"""The only package that imports ray: plan, layout, stages (as data), the Dataset build, the run, the cluster."""
