"""The test suite, by feature: one folder per kind of test, helpers in tests/support.

Tests import the project as the installed package (`from dml_app import net`,
`from dml_tool import splitter`), as the product code does.
"""
