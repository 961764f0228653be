"""The shared contract of builder and server: artifact layout, table schemas, preprocessing, model runner."""
