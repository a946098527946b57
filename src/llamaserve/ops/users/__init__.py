"""The user CLI (bin/user_management_cli.sh, bin/bootstrap_user_cli.sh): its parser in
`cli`, what each command does in `commands`."""
