#!/bin/bash
# Runs inside a clean Debian 12 container (tests/test_deb.py): installs the package with apt,
# runs it as the service user (commands, then the service against the test's broker until the
# test has seen its messages arrive), upgrades it in place, removes it and purges it. Each stage's
# state goes to /out/<stage>.* for the test to check. The package is /pkg/$DEB.
set -o errexit -o pipefail -o nounset
export DEBIAN_FRONTEND=noninteractive
NAME=scheduler-publisher
PATHS=(
  /usr/bin/$NAME /usr/lib/$NAME /usr/lib/$NAME/venv/bin/python /usr/lib/$NAME/venv/bin/$NAME
  /lib/systemd/system/$NAME.service /lib/systemd/system/$NAME@.service
  /etc/systemd/system/multi-user.target.wants/$NAME.service
  /etc/$NAME /etc/$NAME/$NAME.toml /etc/$NAME/entries.json /etc/logrotate.d/$NAME
  /var/lib/$NAME /var/log/$NAME /var/log/$NAME/$NAME.log
  /usr/share/man/man1/$NAME.1.gz /usr/share/bash-completion/completions/$NAME
  /usr/share/doc/$NAME/copyright /usr/share/doc/$NAME/changelog.gz
)

snapshot() {  # one line per path: path, then "missing" or owner:group mode type
  for path in "${PATHS[@]}"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
      stat -c '%n %U:%G %a %F' "$path"
    else
      echo "$path missing"
    fi
  done > "/out/$1.paths"
  (getent passwd $NAME || true) > "/out/$1.passwd"
  (getent group $NAME || true) > "/out/$1.group"
  (dpkg-query -W -f='${db:Status-Abbrev}' $NAME 2>/dev/null || true) > "/out/$1.status"
}

as_user() {  # the command's stdout, stderr and exit code, run as the service user
  local stage=$1; shift
  set +o errexit
  (cd /tmp && runuser -u $NAME -- "$@") > "/out/$stage.stdout" 2> "/out/$stage.stderr"
  echo $? > "/out/$stage.rc"
  set -o errexit
}

run_service() {  # the packaged options, but the test's broker and HTTP port (flags win)
  cd /tmp
  setpriv --reuid=$NAME --regid=$NAME --init-groups \
    $NAME run --options-file /etc/$NAME/$NAME.toml \
    --broker 127.0.0.1 --port "$BROKER_PORT" --http-port "$HTTP_PORT" \
    > /out/run.stdout 2> /out/run.stderr &
  local pid=$! deadline=$((SECONDS + 180))
  # The test writes /out/arrived once its subscriber has the messages and the status page
  # answered.
  until [ -e /out/arrived ] || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
  kill -TERM $pid
  set +o errexit
  wait $pid
  echo $? > /out/run.rc
  set -o errexit
  cd /
}

apt-get update -qq
apt-get install -y -qq "/pkg/$DEB" > /out/install.log 2>&1
run_service
snapshot installed
dpkg-query -W -f='${Conffiles}\n' $NAME > /out/installed.conffiles
dpkg-query -W -f='${Depends}\n' $NAME > /out/installed.depends
grep -h '^ExecStart=\|^LogsDirectory=' /lib/systemd/system/$NAME.service > /out/installed.unit
as_user version $NAME --version
as_user validate $NAME validate --options-file /etc/$NAME/$NAME.toml
as_user show-options $NAME show-options --options-file /etc/$NAME/$NAME.toml

# An operator's edit of a conffile, then the same version installed again (the postinst runs
# as on an upgrade: the virtual environment is built again).
echo '# edited by the operator' >> /etc/$NAME/$NAME.toml
dpkg -i "/pkg/$DEB" > /out/reinstall.log 2>&1
as_user reinstalled-version $NAME --version
snapshot reinstalled

apt-get remove -y -qq $NAME > /out/remove.log 2>&1
snapshot removed
tail -n 1 /etc/$NAME/$NAME.toml > /out/removed.toml-tail

apt-get purge -y -qq $NAME > /out/purge.log 2>&1
snapshot purged
