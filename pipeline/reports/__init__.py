"""Users' Junk moves as feedback: a spool the mail store's pipe writes, a worker that drains it.

:mod:`~pipeline.reports.spool` is the program Dovecot's IMAPSieve pipes a moved message to
(``floodgate-report``: standard library only, it writes the report to disk and exits);
:mod:`~pipeline.reports.drain` is ``floodgate report-drain``, which publishes each report to the
feedback topic and removes it only once the broker has acknowledged it. Nothing is imported
here: the pipe program must start in milliseconds.
"""
