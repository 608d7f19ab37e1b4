from onnxpipe.main import main

main()
