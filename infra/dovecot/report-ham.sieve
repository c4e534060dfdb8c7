# Moved out of Junk: report it as ham, unless it went to Trash (deleting spam says nothing about it).
# /etc/dovecot/floodgate/, see floodgate.conf.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string "${mailbox}" "Trash" {
  stop;
}
if environment :matches "imap.user" "*" {
  set "username" "${1}";
}

pipe :copy "floodgate-report" ["ham", "${username}"];
