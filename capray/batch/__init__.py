"""`capray protect`: bulk protection on Ray Data (read groups → decode → protect → encode+write → manifest)."""
