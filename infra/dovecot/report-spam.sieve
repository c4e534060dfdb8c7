# Moved (or copied, or saved) into Junk: report it as spam. /etc/dovecot/floodgate/, see floodgate.conf.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.user" "*" {
  set "username" "${1}";
}

pipe :copy "floodgate-report" ["spam", "${username}"];
