from wsrelay.cli import main

main(prog_name="wsrelay")
