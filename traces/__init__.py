"""Routing traces: schema, Parquet/CSV files, synthetic generators and statistics."""
