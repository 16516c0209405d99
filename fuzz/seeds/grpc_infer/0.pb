
m"
truncate*
	input_idsINT64*e¨;f